"""Merging a LoRA checkpoint into its base model, and the check that the merge is right.

The merge (merge_lora.py, merge_lora_plus.py) computes in fp32: each LoRA pair adds
ΔW = coef · (alpha / r) · B A to `<prefix>.weight` (coef 1 unless merge_lora_plus.py --layer_filter gives
one per layer), and the time_* / ln tensors the LoRA trained replace the base's. Then the logits of the
merged model are compared with those of base + LoRA on a few tokens before anything is cast back to the
base's dtype and written.

A LoRA file is validated on its own first (LoraCheckpoint), then against the base (check_fits_base), so
every mistake gets one message naming the file, the key and the fix.
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from src.io.checkpoint import compare_weights, is_lora_checkpoint
from src.errors import UserInputError
from src.lora.adapters import SETTINGS_KEY, attach_lora, decode_settings, family_of_base, identity_differences
from src.lora.settings import LoraSettings
from src.models import ModelFamily, read_model_weights

# The merge check: logits of the merged model (fp32, before the cast to the base dtype) against the
# base + LoRA model, on CHECK_TOKENS tokens, must agree within CHECK_RTOL * max(1, max |logit|).
# fp32 reassociation error is ~1e-6 relative; a merge bug moves logits by the size of the LoRA effect.
CHECK_TOKENS = 8
CHECK_RTOL = 1e-3


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = scale · B A in fp32: [out, r] @ [r, in] -> [out, in]. The one place the product is formed."""
    return (lora_B.float() @ lora_A.float()) * scale


# ---------------------------------------------------------------- the LoRA file on its own


@dataclass
class LoraCheckpoint:
    """A LoRA .pth split into its parts, validated on its own (before it meets a base)."""
    path: str
    pairs: dict  # prefix -> (lora_A [r, in], lora_B [out, r]); prefix + ".weight" is the merged key
    replaced: dict  # key -> tensor that replaces the base's (time_* / ln parameters)
    settings: Optional[LoraSettings] = None
    base: Optional[dict] = None  # identity of the base it was trained on (its family's identity(shape))
    family: ModelFamily = None  # the base's family: recorded with the settings (files without them: the default)

    @classmethod
    def from_weights(cls, weights: dict, path) -> "LoraCheckpoint":
        weights = dict(weights)
        settings = base = None
        if SETTINGS_KEY in weights:
            settings, base = decode_settings(weights.pop(SETTINGS_KEY), path)
        family = family_of_base(base)
        halves = {}
        replaced = {}
        foreign = []
        for key, tensor in weights.items():
            prefix, _, leaf = key.rpartition(".")
            if leaf in ("lora_A", "lora_B") and prefix:
                halves.setdefault(prefix, {})[leaf] = tensor
            elif family.trained_whole_part(key) is not None:  # time_* / ln tensors the LoRA trained whole
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
            if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0] or A.shape[0] == 0:
                raise UserInputError(f"{path}: {prefix}.lora_A {tuple(A.shape)} and .lora_B {tuple(B.shape)} do "
                                     f"not form a product B A (need A [r, in], B [out, r], r >= 1).")
            if settings is not None and A.shape[0] != settings.r:
                raise UserInputError(f"{path}: {prefix}.lora_A has rank {A.shape[0]}, but the stored settings say "
                                     f"r {settings.r}: the file is inconsistent.")
            pairs[prefix] = (A, B)
        for key, tensor in weights.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise UserInputError(f"{path}: {key} contains NaN or infinite values; merge a checkpoint from "
                                     f"before the loss diverged.")
        return cls(str(path), pairs, replaced, settings, base, family)


def resolve_alpha(alpha: Optional[float], lora: LoraCheckpoint,
                  given_as: str = "the lora_alpha argument (e.g. merge_lora.py 32 BASE.pth LORA.pth OUT.pth)") -> float:
    """alpha from the command line and/or the file's settings; both given must agree. `given_as` says how the
    command line gives it, for the messages."""
    stored = lora.settings.alpha if lora.settings is not None else None
    if alpha is None and stored is None:
        raise UserInputError(f"{lora.path} stores no LoRA settings (it comes from the original toolkit): give the "
                             f"lora_alpha it was trained with as {given_as}.")
    if alpha is not None and stored is not None and alpha != stored:
        raise UserInputError(f"the lora_alpha {alpha:g} given disagrees with lora_alpha {stored:g} stored in "
                             f"{lora.path}; leave it out to use the stored value.")
    return float(alpha if alpha is not None else stored)


# ---------------------------------------------------------------- the base model


def check_fits_base(lora: LoraCheckpoint, base: dict, family: ModelFamily, cfg, base_path) -> None:
    """Every LoRA tensor must land on a base tensor of the right shape; the stored identity must match. `cfg` is
    the shape of `base`, a model of `family`."""
    if family is not lora.family:
        raise UserInputError(f"{lora.path} was trained on an {lora.family.title} model, but {base_path} is an "
                             f"{family.title} model.")
    if lora.base is not None and lora.base != family.identity(cfg):
        raise UserInputError(f"{lora.path} was trained on another base model than {base_path} (LoRA's base vs this "
                             f"one: {identity_differences(lora.base, family.identity(cfg))}).")
    # what the merge writes into the base: each pair's B A [out, in] onto <prefix>.weight, each time/ln tensor
    # onto its own key
    products = {f"{prefix}.weight": (B.shape[0], A.shape[1]) for prefix, (A, B) in lora.pairs.items()}
    onto_weights = compare_weights(base, products)
    onto_replaced = compare_weights(base, lora.replaced)
    lacking = [*onto_weights.unexpected, *onto_replaced.unexpected]  # keys the base does not have
    if lacking:
        key = lacking[0]
        layer = family.layer_of(key)
        source = f"{key.removesuffix('.weight')}.lora_A" if key in products else key
        if layer is not None and layer >= cfg.n_layer:
            raise UserInputError(f"{lora.path} has {source} for layer {layer}, but {base_path} has {cfg.n_layer} "
                                 f"layers (0-{cfg.n_layer - 1}): this LoRA belongs to a bigger model.")
        raise UserInputError(f"{lora.path} has {source}, but {base_path} has no {key} to apply it to.")
    if onto_weights.mismatched:
        key = onto_weights.mismatched[0]
        out_features, in_features = products[key]
        raise UserInputError(f"{lora.path}: {key.removesuffix('.weight')}.lora_B @ lora_A is {out_features} x "
                             f"{in_features}, but {base_path} has {key} {tuple(base[key].shape)}: the LoRA was "
                             f"trained on a model of another size.")
    if onto_replaced.mismatched:
        key = onto_replaced.mismatched[0]
        raise UserInputError(f"{lora.path}: {key} {tuple(lora.replaced[key].shape)} does not fit {base_path}'s "
                             f"{tuple(base[key].shape)}: the LoRA was trained on a model of another size.")


# ---------------------------------------------------------------- merging and its check


@dataclass
class MergeReport:
    merged: int  # LoRA pairs folded into weights
    replaced: int  # time/ln tensors taken from the LoRA file
    alpha: float
    max_diff: float  # max |merged - unmerged| logit on the check tokens
    tolerance: float


def _selected(family: ModelFamily, key: str, layer_coef: Optional[dict]) -> bool:
    """merge_lora_plus: keys of unlisted layers are ignored; keys outside blocks always apply."""
    layer = family.layer_of(key)
    return layer_coef is None or layer is None or layer in layer_coef


def merge_lora_state_dict(base: dict, lora: LoraCheckpoint, alpha: float, layer_coef: Optional[dict] = None,
                          device="cpu") -> dict:
    """The tensors a merge changes, {key: fp32 tensor on device}: W + coef · (alpha/r) · B A for each LoRA
    pair, and the time/ln values that replace the base's. With `layer_coef` ({layer: coef}, merge_lora_plus),
    pairs and replacements of unlisted layers are left out and each pair's ΔW is multiplied by its layer's
    coef (replacements are not scaled)."""
    changed = {}
    for key, tensor in lora.replaced.items():
        if _selected(lora.family, key, layer_coef):
            changed[key] = tensor.to(device, torch.float32)
    for prefix, (A, B) in lora.pairs.items():
        if not _selected(lora.family, prefix, layer_coef):
            continue
        key = f"{prefix}.weight"
        changed[key] = base[key].to(device, torch.float32) + delta_weight(
            A.to(device), B.to(device), _pair_scale(lora.family, prefix, A, alpha, layer_coef))
    return changed


def _pair_scale(family: ModelFamily, prefix: str, lora_A: torch.Tensor, alpha: float,
                layer_coef: Optional[dict]) -> float:
    layer = family.layer_of(prefix)
    coef = 1.0 if layer_coef is None or layer is None else layer_coef[layer]
    return coef * alpha / lora_A.shape[0]  # r = rank of this pair, as the original


@contextmanager
def _full_fp32_matmul():
    """The check compares fp32 results: no TF32 on GPUs while it runs. (The switch train.py sets,
    src/train/strategy.py set_float_precision: torch refuses to read one of its two APIs after the other was set.)"""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@torch.no_grad()
def check_merge(base: dict, lora: LoraCheckpoint, alpha: float, layer_coef: Optional[dict], changed: dict,
                cfg, device, base_path) -> tuple:
    """Logits of the merged model (fp32) against the base + LoRA model on CHECK_TOKENS tokens.

    The two models are built one after the other, so memory peaks at one fp32 model plus `changed`.
    Returns (max |difference|, tolerance); raises UserInputError if they disagree or are not finite.
    """
    family = lora.family
    tokens = torch.randint(0, cfg.vocab_size, (1, CHECK_TOKENS), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)
    with _full_fp32_matmul():
        replaced = {k: v for k, v in lora.replaced.items() if _selected(family, k, layer_coef)}
        unmerged = family.from_weights(cfg, {**base, **replaced}, device, base_path)
        for prefix, (A, B) in lora.pairs.items():
            if _selected(family, prefix, layer_coef):
                try:
                    module = attach_lora(unmerged, prefix, A.shape[0],
                                         _pair_scale(family, prefix, A, alpha, layer_coef))
                except ValueError:
                    raise UserInputError(f"{lora.path} has {prefix}.lora_A, but {prefix} is not a Linear layer; "
                                         f"LoRA on it cannot be merged.") from None
                module.lora_A.copy_(A)
                module.lora_B.copy_(B)
        expected = unmerged(tokens)[0].float().cpu()
        del unmerged
        merged = family.from_weights(cfg, {**base, **changed}, device, base_path)
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

    Returns (state dict with exactly base's keys in its family's layout (ModelFamily.canonical_weights), each in
    base's dtype, on the CPU; MergeReport).
    """
    if is_lora_checkpoint(base):
        raise UserInputError(f"{base_path} is itself a LoRA checkpoint (it holds lora_A/lora_B keys or LoRA "
                             f"settings); pass the full base model it was trained on, then the LoRA file.")
    family, base = read_model_weights(base, base_path)
    cfg = family.shape_of_weights(base, base_path)
    check_fits_base(lora, base, family, cfg, base_path)
    if layer_coef and max(layer_coef) >= cfg.n_layer:
        raise UserInputError(f"--layer_filter lists layer {max(layer_coef)}, but {base_path} has {cfg.n_layer} "
                             f"layers (0-{cfg.n_layer - 1}).")
    changed = merge_lora_state_dict(base, lora, alpha, layer_coef, device)
    max_diff, tolerance = check_merge(base, lora, alpha, layer_coef, changed, cfg, device, base_path)
    merged = {k: (changed.pop(k).to("cpu", v.dtype) if k in changed else v) for k, v in base.items()}
    n_pairs = sum(1 for p in lora.pairs if _selected(family, p, layer_coef))
    n_replaced = sum(1 for k in lora.replaced if _selected(family, k, layer_coef))
    return merged, MergeReport(n_pairs, n_replaced, alpha, max_diff, tolerance)
