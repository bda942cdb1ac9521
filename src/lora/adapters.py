"""LoRA training: the LoraLinear module, which parameters train, and the slim LoRA checkpoint.

A LoRA module adds a low-rank update to a frozen Linear (r << in, out):

    y = x Wᵀ + scale · (dropout(x) Aᵀ) Bᵀ        W [out, in] frozen, A [r, in], B [out, r]
    ΔW = scale · B A,  scale = alpha / r          A ~ Kaiming-uniform, B = 0 at the start, so ΔW = 0

`--lora_parts` and `--lora_layers` (src/lora/settings.py) choose the Linears that get LoRA and the
time_* / ln parameters that train whole; everything else is frozen.

A LoRA checkpoint is a plain {key: tensor} .pth holding only the trained tensors under the original
toolkit's names (`blocks.3.att.key.lora_A`, `blocks.3.att.time_decay`, ...), plus the settings as
UTF-8 JSON in a uint8 tensor under SETTINGS_KEY. The original toolkit's merge_lora.py copies every
LoRA-file key into the base, merges `<prefix>.weight` wherever `<prefix>.lora_A` exists and drops every
other key containing "lora": our settings key contains "lora", is no `<prefix>.lora_A/B` and does not
end in `.weight`, so the original script still merges our files and leaves the settings out.
"""
import json
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.io.checkpoint import LORA_SETTINGS_KEY, compare_weights, load_weights
from src.errors import UserInputError
from src.layer_spec import format_layers
from src.lora.settings import LoraSettings
from src.models import ModelFamily, default_family, family_named, family_of_model

SETTINGS_KEY = LORA_SETTINGS_KEY
SETTINGS_FORMAT = "rwkv-infctx LoRA"
SETTINGS_VERSION = 1


# ---------------------------------------------------------------- the settings record of a checkpoint


def identity_differences(stored: dict, actual: dict) -> str:
    """"vocab_size 65536 vs 50277, ..." for the entries where a LoRA's recorded base differs from a model."""
    return ", ".join(f"{k} {stored.get(k)} vs {v}" for k, v in actual.items() if stored.get(k) != v)


def family_of_base(base: Optional[dict]) -> ModelFamily:
    """The family of the base a LoRA recorded (its identity), the default one (RWKV-4) where it names none: files of
    RWKV-4 runs record no family, and the original toolkit's files no base at all."""
    return family_named(base["family"]) if base and "family" in base else default_family()


def encode_settings(settings: LoraSettings, base: dict) -> torch.Tensor:
    """The settings and the base's identity (its family's identity(shape)) as UTF-8 JSON bytes in a uint8 tensor
    (a .pth stays a plain dict of tensors)."""
    record = {"format": SETTINGS_FORMAT, "version": SETTINGS_VERSION, "r": settings.r, "alpha": settings.alpha,
              "dropout": settings.dropout, "parts": list(settings.parts), "layers": list(settings.layers),
              "base": base}
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


def trainable_names(model: nn.Module, settings: LoraSettings) -> list:
    """Every parameter that trains, in model order: lora_A/B of the LoraLinear layers of the selected layers,
    and there the tensors the chosen parts train whole (time_* for part time, block norms for part ln)."""
    layers = set(settings.layers)
    return [name for name, _ in model.named_parameters()
            if family_of_model(model).layer_of(name) in layers
            and (name.endswith((".lora_A", ".lora_B")) or family_of_model(model).trained_whole_part(name) in settings.parts)]


def apply_lora(model: nn.Module, settings: LoraSettings) -> list:
    """Wrap the selected Linear layers (call after the base weights are loaded); returns their names."""
    names = family_of_model(model).lora_projections(model.cfg, settings.parts, settings.layers)
    for name in names:
        attach_lora(model, name, settings.r, settings.scale, settings.dropout)
    return names


def mark_trainable(model: nn.Module, names) -> None:
    names = set(names)
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)


# ---------------------------------------------------------------- the slim checkpoint


def lora_state_dict(model: nn.Module, settings: LoraSettings, state_dict: Optional[dict] = None) -> dict:
    """The slim LoRA checkpoint of a LoRA model: its trained tensors under their model names, in model order,
    plus the settings under SETTINGS_KEY. The tensors come from `state_dict` when given (the saver's copy,
    gathered onto the CPU), else from the model itself."""
    weights = model.state_dict() if state_dict is None else state_dict
    slim = {name: weights[name] for name in trainable_names(model, settings)}
    slim[SETTINGS_KEY] = encode_settings(settings, family_of_model(model).identity(model.cfg))
    return slim


# ---------------------------------------------------------------- training


def prepare_lora_training(model: nn.Module, settings: LoraSettings, lora_load: str) -> str:
    """Turn a model holding its base weights into a LoRA model: wrap the chosen Linears, restore
    --lora_load (`lora_load`; empty: none), freeze all but the LoRA/time/ln parameters. Returns a one-line summary."""
    modules = apply_lora(model, settings)
    names = trainable_names(model, settings)
    if not names:
        raise UserInputError(f"--lora_parts {','.join(settings.parts)} selects nothing in layers "
                             f"{format_layers(settings.layers)} (with --pre_ffn, block 0 has no att).")
    restored = ""
    if lora_load:
        restored = "; " + load_lora_checkpoint(model, settings, names, lora_load)
    mark_trainable(model, names)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (f"LoRA {settings.describe()}: {len(modules)} LoRA layers, {trained:,} of {total:,} parameters "
            f"train ({100 * trained / total:.2f}%){restored}")


def load_lora_checkpoint(model: nn.Module, settings: LoraSettings, names: list, path) -> str:
    """Load a LoRA checkpoint (ours, or the original toolkit's without settings) into the LoRA model.
    `names` are the parameters this run trains: the file may hold fewer (the rest start fresh), not others."""
    weights = load_weights(path, what="--lora_load")
    stored = weights.pop(SETTINGS_KEY, None)
    saved = None
    if stored is not None:
        saved, identity = decode_settings(stored, path)
        if saved.alpha != settings.alpha:
            raise UserInputError(f"--lora_load {path} was trained with lora_alpha {saved.alpha:g}, but "
                                 f"--lora_alpha is {settings.alpha:g}; pass --lora_alpha {saved.alpha:g}.")
        family, trained_on = family_of_model(model), family_of_base(identity)
        if trained_on is not family:  # the identities of two families share no field worth listing
            raise UserInputError(f"--lora_load {path} was trained on an {trained_on.title} model, but --load_model is "
                                 f"an {family.title} model; pass the base it was trained on to --load_model.")
        if identity != family.identity(model.cfg):
            raise UserInputError(f"--lora_load {path} was trained on another base model than this one (file vs "
                                 f"model: {identity_differences(identity, family.identity(model.cfg))}).")
    state = model.state_dict()
    differences = compare_weights({name: state[name] for name in names}, weights)
    unexpected = differences.unexpected
    if unexpected:
        raise UserInputError(
            f"--lora_load {path} holds tensors this run does not train ({len(unexpected)}: "
            f"{', '.join(unexpected[:6])}{', ...' if len(unexpected) > 6 else ''}); it was saved with other "
            f"--lora_parts/--lora_layers" + (f" ({saved.describe()})" if saved is not None else "")
            + f" than this run's ({settings.describe()}).")
    if differences.mismatched:
        wrong = [f"{k} {tuple(weights[k].shape)} vs {tuple(state[k].shape)}" for k in differences.mismatched]
        raise UserInputError(f"--lora_load {path} does not fit this model (file vs model: {'; '.join(wrong[:4])}); "
                             f"check --lora_r (rank = lora_A rows) and the model flags.")
    model.load_state_dict(weights, strict=False)
    fresh = len(differences.missing)
    return f"restored {len(weights)} tensors from {path}" + (f", {fresh} start fresh" if fresh else "")
