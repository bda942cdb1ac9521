"""LoRA for RWKV-4: the LoraLinear module, which parameters train, slim LoRA checkpoints, and merging.

A LoRA module adds a low-rank update to a frozen Linear (r << in, out):

    y = x Wᵀ + scale · (dropout(x) Aᵀ) Bᵀ        W [out, in] frozen, A [r, in], B [out, r]
    ΔW = scale · B A,  scale = alpha / r          A ~ Kaiming-uniform, B = 0 at the start, so ΔW = 0

Parts (`--lora_parts`), applied only to the layers of `--lora_layers`:
    att   LoRA on the time-mix key, value, receptance (not output)
    ffn   LoRA on the channel-mix key, receptance, value
    time  the time_* parameters of those blocks train whole (time_decay, time_first, time_mix_*)
    ln    the blocks' ln0 / ln1 / ln2 train whole (not ln_out)
Everything else is frozen.

A LoRA checkpoint is a plain {key: tensor} .pth holding only the trained tensors under the original
toolkit's names (`blocks.3.att.key.lora_A`, `blocks.3.att.time_decay`, ...), plus the settings as
UTF-8 JSON in a uint8 tensor under SETTINGS_KEY. The original `merge_lora.py` copies every LoRA-file
key into the base, merges `<prefix>.weight` wherever `<prefix>.lora_A` exists and drops every other
key containing "lora": our settings key contains "lora", is no `<prefix>.lora_A/B` and does not end in
`.weight`, so the original script still merges our files and leaves the settings out.
"""
import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.checkpoint import load_weights
from src.config import TrainConfig
from src.errors import UserInputError
from src.lora_settings import LoraSettings, format_layers
from src.model import RWKV, RWKVConfig

# Linear layers that get LoRA for each part: sub-module of the block -> projections.
PART_PROJECTIONS = {"att": ("att", ("key", "value", "receptance")), "ffn": ("ffn", ("key", "receptance", "value"))}
BLOCK_NORMS = ("ln0", "ln1", "ln2")

SETTINGS_KEY = "lora_settings"
SETTINGS_FORMAT = "rwkv-infctx LoRA"
SETTINGS_VERSION = 1
# What identifies the base a LoRA was trained on (a World LoRA has the same A/B shapes as a Pile one).
BASE_IDENTITY = ("vocab_size", "n_layer", "n_embd", "dim_att", "dim_ffn", "pre_ffn", "head_qk")

# The merge check: logits of the merged model (fp32, before the cast to the base dtype) against the
# base + LoRA model, on CHECK_TOKENS tokens, must agree within CHECK_RTOL * max(1, max |logit|).
# fp32 reassociation error is ~1e-6 relative; a merge bug moves logits by the size of the LoRA effect.
CHECK_TOKENS = 8
CHECK_RTOL = 1e-3

_LAYER_OF_KEY = re.compile(r"^blocks\.(\d+)\.")
# Keys a LoRA checkpoint may hold besides lora_A/lora_B: the tensors the time and ln parts train whole.
_REPLACEABLE = re.compile(r"^blocks\.\d+\.(?:(?:att|ffn|ffnPre)\.time_\w+|ln[012]\.(?:weight|bias))$")


# ---------------------------------------------------------------- the settings record of a checkpoint


def base_identity(cfg: RWKVConfig) -> dict:
    identity = {name: getattr(cfg, name) for name in BASE_IDENTITY}
    identity["pre_ffn"] = bool(cfg.pre_ffn)
    return identity


def identity_differences(stored: dict, actual: dict) -> str:
    """"vocab_size 65536 vs 50277, ..." for the entries where a LoRA's recorded base differs from a model."""
    return ", ".join(f"{k} {stored.get(k)} vs {v}" for k, v in actual.items() if stored.get(k) != v)


def encode_settings(settings: LoraSettings, base: RWKVConfig) -> torch.Tensor:
    """The settings as UTF-8 JSON bytes in a uint8 tensor (a .pth stays a plain dict of tensors)."""
    record = {"format": SETTINGS_FORMAT, "version": SETTINGS_VERSION, "r": settings.r, "alpha": settings.alpha,
              "dropout": settings.dropout, "parts": list(settings.parts), "layers": list(settings.layers),
              "base": base_identity(base)}
    return torch.tensor(list(json.dumps(record).encode("utf-8")), dtype=torch.uint8)


def decode_settings(tensor: torch.Tensor, path) -> tuple:
    """(LoraSettings, base identity dict) from encode_settings' tensor; a damaged record is an error."""
    try:
        record = json.loads(bytes(tensor.tolist()).decode("utf-8"))
        if record.get("format") != SETTINGS_FORMAT:
            raise ValueError(f"unknown format {record.get('format')!r}")
        if record.get("version", 0) > SETTINGS_VERSION:
            raise ValueError(f"version {record['version']} is newer than this toolkit reads ({SETTINGS_VERSION})")
        settings = LoraSettings(r=int(record["r"]), alpha=float(record["alpha"]), dropout=float(record["dropout"]),
                                parts=tuple(record["parts"]), layers=tuple(int(i) for i in record["layers"]))
        return settings, dict(record["base"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # UnicodeDecodeError is a ValueError
        raise UserInputError(f"{path}: the LoRA settings under the key {SETTINGS_KEY!r} cannot be read ({e}); "
                             f"delete that key to treat the file as one of the original toolkit (then give alpha).")


# ---------------------------------------------------------------- the module


class LoraLinear(nn.Linear):
    """A bias-free Linear plus a LoRA branch. Keeps `.weight` (same state-dict key as the Linear it wraps)
    and adds `lora_A [r, in]`, `lora_B [out, r]`; dropout acts on the LoRA branch only."""

    def __init__(self, base: nn.Linear, r: int, scale: float, dropout: float = 0.0):
        if base.bias is not None:
            raise ValueError("LoraLinear supports bias-free Linear layers only (RWKV-4 has no biases)")
        # nn.Linear would allocate and initialise a weight only to drop it: build that one on meta
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight = base.weight  # shared, not copied
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear; B = 0 keeps ΔW = 0 at the start
        self.lora_dropout = nn.Dropout(dropout)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., in) -> (..., out); the branch runs at rank r and never forms B A
        lora = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight) + self.scale * lora

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.lora_A.shape[0]}, scale={self.scale:g}"


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = scale · B A in fp32: [out, r] @ [r, in] -> [out, in]. The one place the product is formed."""
    return (lora_B.float() @ lora_A.float()) * scale


def attach_lora(model: nn.Module, name: str, r: int, scale: float, dropout: float = 0.0) -> LoraLinear:
    """Replace the Linear `name` (e.g. "blocks.3.att.key") of `model` by a LoraLinear around its weight."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    linear = getattr(parent, child)
    if not isinstance(linear, nn.Linear) or isinstance(linear, LoraLinear):
        raise ValueError(f"{name} is not a plain Linear layer")
    module = LoraLinear(linear, r, scale, dropout)
    setattr(parent, child, module)
    return module


# ---------------------------------------------------------------- which parameters train


def lora_target_names(model: RWKV, settings: LoraSettings) -> list:
    """Names of the Linear layers that get LoRA: the att/ffn projections of the selected layers."""
    names = []
    for i in settings.layers:
        block = model.blocks[i]
        for part in ("att", "ffn"):
            mix, projections = PART_PROJECTIONS[part]
            if part in settings.parts and hasattr(block, mix):  # with pre_ffn, block 0 has no att
                names += [f"blocks.{i}.{mix}.{projection}" for projection in projections]
    return names


def trainable_names(model: RWKV, settings: LoraSettings) -> list:
    """Every parameter that trains, in model order: lora_A/B of the LoraLinear layers of the selected
    layers, their time_* parameters (part time) and their ln0/ln1/ln2 (part ln)."""
    chosen = set()
    for i in settings.layers:
        block = model.blocks[i]
        for name, _ in block.named_parameters():
            path = name.split(".")
            is_lora = path[-1] in ("lora_A", "lora_B")
            is_time = "time" in settings.parts and path[-1].startswith("time_")
            is_norm = "ln" in settings.parts and path[0] in BLOCK_NORMS
            if is_lora or is_time or is_norm:
                chosen.add(f"blocks.{i}.{name}")
    return [name for name, _ in model.named_parameters() if name in chosen]


def apply_lora(model: RWKV, settings: LoraSettings) -> list:
    """Wrap the selected Linear layers (call after the base weights are loaded); returns their names."""
    names = lora_target_names(model, settings)
    for name in names:
        attach_lora(model, name, settings.r, settings.scale, settings.dropout)
    return names


def mark_trainable(model: nn.Module, names) -> None:
    names = set(names)
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)


def lora_state_dict(model: RWKV, settings: LoraSettings) -> dict:
    """The slim LoRA checkpoint: the trained tensors under their model names, plus the settings."""
    keep = set(trainable_names(model, settings))
    weights = {k: v for k, v in model.state_dict().items() if k in keep}
    weights[SETTINGS_KEY] = encode_settings(settings, model.cfg)
    return weights


# ---------------------------------------------------------------- training


def prepare_lora_training(model: RWKV, cfg: TrainConfig) -> str:
    """Turn a model holding its base weights into a LoRA model: wrap the chosen Linears, restore
    --lora_load, freeze all but the LoRA/time/ln parameters. Returns a one-line summary."""
    settings = cfg.lora_settings
    modules = apply_lora(model, settings)
    names = trainable_names(model, settings)
    if not names:
        raise UserInputError(f"--lora_parts {','.join(settings.parts)} selects nothing in layers "
                             f"{format_layers(settings.layers)} (with --pre_ffn, block 0 has no att).")
    restored = ""
    if cfg.lora_load:
        restored = "; " + load_lora_checkpoint(model, settings, names, cfg.lora_load)
    mark_trainable(model, names)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (f"LoRA {settings.describe()}: {len(modules)} LoRA layers, {trained:,} of {total:,} parameters "
            f"train ({100 * trained / total:.2f}%){restored}")


def load_lora_checkpoint(model: RWKV, settings: LoraSettings, names: list, path) -> str:
    """Load a LoRA checkpoint (ours, or the original toolkit's without settings) into the LoRA model."""
    weights = load_weights(path, what="--lora_load")
    stored = weights.pop(SETTINGS_KEY, None)
    if stored is not None:
        saved, identity = decode_settings(stored, path)
        if saved.alpha != settings.alpha:
            raise UserInputError(f"--lora_load {path} was trained with lora_alpha {saved.alpha:g}, but "
                                 f"--lora_alpha is {settings.alpha:g}; pass --lora_alpha {saved.alpha:g}.")
        if identity != base_identity(model.cfg):
            raise UserInputError(f"--lora_load {path} was trained on another base model than this one (file vs "
                                 f"model: {identity_differences(identity, base_identity(model.cfg))}).")
    expected = model.state_dict()
    names = set(names)
    unexpected = [k for k in weights if k not in names]
    if unexpected:
        raise UserInputError(
            f"--lora_load {path} holds tensors this run does not train ({len(unexpected)}: "
            f"{', '.join(unexpected[:6])}{', ...' if len(unexpected) > 6 else ''}); it was saved with other "
            f"--lora_parts/--lora_layers" + (f" ({saved.describe()})" if stored is not None else "")
            + f" than this run's ({settings.describe()}).")
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in weights.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise UserInputError(f"--lora_load {path} does not fit this model (file vs model: {'; '.join(wrong[:4])}); "
                             f"check --lora_r (rank = lora_A rows) and the model flags.")
    model.load_state_dict(weights, strict=False)
    fresh = len(names) - len(weights)
    return f"restored {len(weights)} tensors from {path}" + (f", {fresh} start fresh" if fresh else "")


def lora_weights_of(cfg: TrainConfig, full_state_dict):
    """For the WeightSaver: (trainer, pl_module) -> the slim LoRA checkpoint of its (inner) model.

    `full_state_dict(trainer, pl_module)` gathers the whole state dict (collective under ZeRO-3; {} off rank 0).
    """
    settings = cfg.lora_settings

    def weights_of(trainer, pl_module) -> dict:
        full = full_state_dict(trainer, pl_module)
        if not full:
            return {}
        keep = trainable_names(pl_module.model, settings)
        return {**{k: full[k] for k in keep}, SETTINGS_KEY: encode_settings(settings, pl_module.model.cfg)}

    return weights_of


# ---------------------------------------------------------------- merging


@dataclass
class LoraCheckpoint:
    """A LoRA .pth split into its parts, validated on its own (before it meets a base)."""
    path: str
    pairs: dict  # prefix -> (lora_A [r, in], lora_B [out, r]); prefix + ".weight" is the merged key
    replaced: dict  # key -> tensor that replaces the base's (time_* / ln parameters)
    settings: Optional[LoraSettings] = None
    base: Optional[dict] = None  # identity of the base it was trained on (BASE_IDENTITY)

    @classmethod
    def from_weights(cls, weights: dict, path) -> "LoraCheckpoint":
        weights = dict(weights)
        settings = base = None
        if SETTINGS_KEY in weights:
            settings, base = decode_settings(weights.pop(SETTINGS_KEY), path)
        halves = {}
        replaced = {}
        foreign = []
        for key, tensor in weights.items():
            prefix, _, leaf = key.rpartition(".")
            if leaf in ("lora_A", "lora_B") and prefix:
                halves.setdefault(prefix, {})[leaf] = tensor
            elif _REPLACEABLE.match(key):
                replaced[key] = tensor
            else:
                foreign.append(key)
        if foreign:
            raise UserInputError(f"{path} holds {', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}, which "
                                 f"LoRA training never saves: is it a full model rather than a LoRA checkpoint? (The "
                                 f"order is base model, LoRA checkpoint, output.)")
        if not halves and not replaced:
            raise UserInputError(f"{path} holds no LoRA tensors (no lora_A/lora_B, time_* or ln keys).")
        pairs = {}
        for prefix, half in halves.items():
            if set(half) != {"lora_A", "lora_B"}:
                have, lack = ("lora_A", "lora_B") if "lora_A" in half else ("lora_B", "lora_A")
                raise UserInputError(f"{path} has {prefix}.{have} but no {prefix}.{lack}: the file is incomplete.")
            A, B = half["lora_A"], half["lora_B"]
            if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
                raise UserInputError(f"{path}: {prefix}.lora_A {tuple(A.shape)} and .lora_B {tuple(B.shape)} do "
                                     f"not form a product B A (need A [r, in], B [out, r]).")
            if settings is not None and A.shape[0] != settings.r:
                raise UserInputError(f"{path}: {prefix}.lora_A has rank {A.shape[0]}, but the stored settings say "
                                     f"r {settings.r}: the file is inconsistent.")
            pairs[prefix] = (A, B)
        for key, tensor in weights.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise UserInputError(f"{path}: {key} contains NaN or infinite values; merge a checkpoint from "
                                     f"before the loss diverged.")
        return cls(str(path), pairs, replaced, settings, base)


def resolve_alpha(alpha: Optional[float], lora: LoraCheckpoint) -> float:
    """alpha from the command line and/or the file's settings; both given must agree."""
    stored = lora.settings.alpha if lora.settings is not None else None
    if alpha is None and stored is None:
        raise UserInputError(f"{lora.path} stores no LoRA settings (it comes from the original toolkit): give the "
                             f"lora_alpha it was trained with, e.g. merge_lora.py 32 BASE.pth LORA.pth OUT.pth.")
    if alpha is not None and stored is not None and alpha != stored:
        raise UserInputError(f"lora_alpha {alpha:g} on the command line disagrees with lora_alpha {stored:g} stored in "
                             f"{lora.path}; drop the alpha argument to use the stored value.")
    return float(alpha if alpha is not None else stored)


def model_config_of(weights: dict, path="base") -> RWKVConfig:
    """The RWKVConfig whose state dict has the shapes of `weights` (a full v4neo model)."""
    if "emb.weight" not in weights:
        raise UserInputError(f"{path} is not a full RWKV-4 model (it has no emb.weight).")
    layers = sorted({int(m[1]) for m in map(_LAYER_OF_KEY.match, weights) if m})
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
            tiny_att_layer=int(_LAYER_OF_KEY.match(tiny[0])[1]) if tiny else -999,
            my_pos_emb=weights["blocks.0.pos_emb_x"].shape[1] if "blocks.0.pos_emb_x" in weights else 0,
            wkv_backend="torch")
    except KeyError as e:
        raise UserInputError(f"{path} is not a full RWKV-4 model (it has no {e.args[0]}).")


def model_from_weights(cfg: RWKVConfig, weights: dict, device, path="base") -> RWKV:
    """An fp32 RWKV on `device` holding `weights` (strict: the keys and shapes must be exactly the model's)."""
    with torch.device("meta"):  # no allocation or init for weights about to be replaced
        model = RWKV(cfg)
    expected = model.state_dict()
    unknown = [k for k in weights if k not in expected]
    missing = [k for k in expected if k not in weights]
    wrong = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if unknown or missing or wrong:
        raise UserInputError(f"{path} does not have the layout of an RWKV-4 model this toolkit knows (unknown keys: "
                             f"{unknown[:4]}, missing: {missing[:4]}, other shapes: {wrong[:4]}), so a merge cannot "
                             f"be checked.")
    model.load_state_dict({k: v.to(device, torch.float32) for k, v in weights.items()}, assign=True)
    return model.eval()


@dataclass
class MergeReport:
    merged: int  # LoRA pairs folded into weights
    replaced: int  # time/ln tensors taken from the LoRA file
    alpha: float
    max_diff: float  # max |merged - unmerged| logit on the check tokens
    tolerance: float


def _layer_of(key: str) -> Optional[int]:
    match = _LAYER_OF_KEY.match(key)
    return int(match[1]) if match else None


def _selected(key: str, layer_coef: Optional[dict]) -> bool:
    """merge_lora_plus: keys of unlisted layers are ignored; keys outside blocks always apply."""
    layer = _layer_of(key)
    return layer_coef is None or layer is None or layer in layer_coef


def check_fits_base(lora: LoraCheckpoint, base: dict, cfg: RWKVConfig, base_path) -> None:
    """Every LoRA tensor must land on a base tensor of the right shape; the stored identity must match."""
    if lora.base is not None and lora.base != base_identity(cfg):
        raise UserInputError(f"{lora.path} was trained on another base model than {base_path} (LoRA's base vs this "
                             f"one: {identity_differences(lora.base, base_identity(cfg))}).")
    targets = {f"{prefix}.weight": prefix for prefix in lora.pairs}
    for key in [*targets, *lora.replaced]:
        if key in base:
            continue
        layer = _layer_of(key)
        source = f"{targets[key]}.lora_A" if key in targets else key
        if layer is not None and layer >= cfg.n_layer:
            raise UserInputError(f"{lora.path} has {source} for layer {layer}, but {base_path} has {cfg.n_layer} "
                                 f"layers (0-{cfg.n_layer - 1}): this LoRA belongs to a bigger model.")
        raise UserInputError(f"{lora.path} has {source}, but {base_path} has no {key} to apply it to.")
    for prefix, (A, B) in lora.pairs.items():
        W = base[f"{prefix}.weight"]
        if W.dim() != 2 or (B.shape[0], A.shape[1]) != tuple(W.shape):
            raise UserInputError(f"{lora.path}: {prefix}.lora_B @ lora_A is {B.shape[0]} x {A.shape[1]}, but "
                                 f"{base_path} has {prefix}.weight {tuple(W.shape)}: the LoRA was trained on a "
                                 f"model of another size.")
    for key, tensor in lora.replaced.items():
        if tensor.shape != base[key].shape:
            raise UserInputError(f"{lora.path}: {key} {tuple(tensor.shape)} does not fit {base_path}'s "
                                 f"{tuple(base[key].shape)}: the LoRA was trained on a model of another size.")


def merge_lora_state_dict(base: dict, lora: LoraCheckpoint, alpha: float, layer_coef: Optional[dict] = None,
                          device="cpu") -> dict:
    """The tensors a merge changes, {key: fp32 tensor on device}: W + coef · (alpha/r) · B A for each LoRA
    pair, and the time/ln values that replace the base's. With `layer_coef` ({layer: coef}, merge_lora_plus),
    pairs and replacements of unlisted layers are left out and each pair's ΔW is multiplied by its layer's
    coef (replacements are not scaled)."""
    changed = {}
    for key, tensor in lora.replaced.items():
        if _selected(key, layer_coef):
            changed[key] = tensor.to(device, torch.float32)
    for prefix, (A, B) in lora.pairs.items():
        if not _selected(prefix, layer_coef):
            continue
        key = f"{prefix}.weight"
        changed[key] = base[key].to(device, torch.float32) + delta_weight(
            A.to(device), B.to(device), _pair_scale(prefix, A, alpha, layer_coef))
    return changed


def _pair_scale(prefix: str, lora_A: torch.Tensor, alpha: float, layer_coef: Optional[dict]) -> float:
    layer = _layer_of(prefix)
    coef = 1.0 if layer_coef is None or layer is None else layer_coef[layer]
    return coef * alpha / lora_A.shape[0]  # r = rank of this pair, as the original


@contextmanager
def _full_fp32_matmul():
    """The check compares fp32 results: no TF32 on GPUs while it runs."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@torch.no_grad()
def check_merge(base: dict, lora: LoraCheckpoint, alpha: float, layer_coef: Optional[dict], changed: dict,
                cfg: RWKVConfig, device, base_path) -> tuple:
    """Logits of the merged model (fp32) against the base + LoRA model on CHECK_TOKENS tokens.

    The two models are built one after the other, so memory peaks at one fp32 model plus `changed`.
    Returns (max |difference|, tolerance); raises UserInputError if they disagree or are not finite.
    """
    tokens = torch.randint(0, cfg.vocab_size, (1, CHECK_TOKENS), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)
    with _full_fp32_matmul():
        replaced = {k: v for k, v in lora.replaced.items() if _selected(k, layer_coef)}
        unmerged = model_from_weights(cfg, {**base, **replaced}, device, base_path)
        for prefix, (A, B) in lora.pairs.items():
            if _selected(prefix, layer_coef):
                try:
                    module = attach_lora(unmerged, prefix, A.shape[0], _pair_scale(prefix, A, alpha, layer_coef))
                except ValueError:
                    raise UserInputError(f"{lora.path} has {prefix}.lora_A, but {prefix} is not a Linear layer; "
                                         f"LoRA on it cannot be merged.") from None
                module.lora_A.copy_(A)
                module.lora_B.copy_(B)
        expected = unmerged(tokens)[0].float().cpu()
        del unmerged
        merged = model_from_weights(cfg, {**base, **changed}, device, base_path)
        got = merged(tokens)[0].float().cpu()
        del merged
    if not (torch.isfinite(expected).all() and torch.isfinite(got).all()):
        raise UserInputError(f"the merge check gave non-finite logits for {base_path} + {lora.path}; nothing written.")
    max_diff = (got - expected).abs().max().item()
    tolerance = CHECK_RTOL * max(1.0, expected.abs().max().item())
    if not max_diff <= tolerance:
        raise UserInputError(f"merge check failed: merged and unmerged logits differ by {max_diff:.3g} on "
                             f"{CHECK_TOKENS} tokens (tolerance {tolerance:.3g}); nothing written. This is a bug: "
                             f"please report it with the shapes of {base_path} and {lora.path}.")
    return max_diff, tolerance


def merge_checked(base: dict, lora: LoraCheckpoint, alpha: float, layer_coef: Optional[dict] = None,
                  device="cpu", base_path="base") -> tuple:
    """Validate, merge in fp32, check merged against unmerged logits, cast back.

    Returns (state dict with exactly base's keys, each in base's dtype, on the CPU; MergeReport).
    """
    if any(k == SETTINGS_KEY or k.endswith((".lora_A", ".lora_B")) for k in base):
        raise UserInputError(f"{base_path} is itself a LoRA checkpoint (it holds lora_A/lora_B keys or LoRA "
                             f"settings); pass the full base model it was trained on, then the LoRA file.")
    cfg = model_config_of(base, base_path)
    check_fits_base(lora, base, cfg, base_path)
    if layer_coef and max(layer_coef) >= cfg.n_layer:
        raise UserInputError(f"--layer_filter lists layer {max(layer_coef)}, but {base_path} has {cfg.n_layer} "
                             f"layers (0-{cfg.n_layer - 1}).")
    changed = merge_lora_state_dict(base, lora, alpha, layer_coef, device)
    max_diff, tolerance = check_merge(base, lora, alpha, layer_coef, changed, cfg, device, base_path)
    merged = {k: (changed.pop(k).to("cpu", v.dtype) if k in changed else v) for k, v in base.items()}
    n_pairs = sum(1 for p in lora.pairs if _selected(p, layer_coef))
    n_replaced = sum(1 for k in lora.replaced if _selected(k, layer_coef))
    return merged, MergeReport(n_pairs, n_replaced, alpha, max_diff, tolerance)
