"""The LoRA settings of a run: the validated --lora_* flags. Pure Python (no torch), so train.py checks its
command line fast. The parts (`--lora_parts`) are the model family's (src/models/<family>/anatomy.py says what
each wraps or trains whole); they apply only to the layers of `--lora_layers`.
"""
import math
from dataclasses import dataclass
from typing import Optional

from src.errors import UserInputError
from src.flags import MAX_WIDTH
from src.layer_spec import format_layers, parse_layer_spec


def check_lora_flags(cfg) -> None:
    """--lora and --lora_load need what they train on (cfg: train.py's flags; reads only --lora, --lora_load,
    --load_model, --resume and --estimate_memory). The --lora_* values themselves are LoraSettings.from_flags's."""
    if cfg.lora_load and not cfg.lora:
        raise UserInputError(f"--lora_load {cfg.lora_load} continues LoRA adapters, which only a --lora run trains; "
                             f"add --lora (with the base model in --load_model), or remove --lora_load.")
    if cfg.lora and not (cfg.load_model or cfg.resume or cfg.estimate_memory):
        raise UserInputError("--lora trains adapters on a base model: pass the base with --load_model (e.g. "
                             "RWKV-4-Pile-1B5.pth); to train a whole model from scratch, leave out --lora.")


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float
    parts: tuple  # subset of the family's LoRA parts, in their order
    layers: tuple  # sorted layer ids

    @property
    def scale(self) -> float:
        """The factor of the LoRA update: ΔW = (alpha / r) · B A."""
        return self.alpha / self.r

    @classmethod
    def from_flags(cls, r: int, alpha: float, dropout: float, parts: str, layers: Optional[str],
                   n_layer: int, known_parts: tuple) -> "LoraSettings":
        """The validated --lora_r, --lora_alpha, --lora_dropout, --lora_parts (among the family's `known_parts`),
        --lora_layers (None = every one of the n_layer layers); one message per mistake."""
        if not 1 <= r <= MAX_WIDTH:
            raise UserInputError(f"--lora_r must be at least 1 and at most {MAX_WIDTH:,}, a model width (got {r}).")
        if not (math.isfinite(alpha) and alpha > 0):
            raise UserInputError(f"--lora_alpha must be a positive number (got {alpha}).")
        if not 0 <= dropout < 1:
            raise UserInputError(f"--lora_dropout must lie in [0, 1) (got {dropout}).")
        given = [p.strip() for p in parts.replace(" ", ",").split(",") if p.strip()]
        unknown = [p for p in given if p not in known_parts]
        if unknown or not given:
            raise UserInputError(f"--lora_parts {parts!r}: use a comma list of {', '.join(known_parts)} "
                                 f"(e.g. att,ffn,time,ln).")
        chosen = range(n_layer) if layers is None else parse_layer_spec(layers, n_layer)
        return cls(r=r, alpha=float(alpha), dropout=float(dropout), parts=tuple(p for p in known_parts if p in given),
                   layers=tuple(sorted(chosen)))

    def describe(self) -> str:
        return (f"r {self.r}, alpha {self.alpha:g}, parts {','.join(self.parts)}, "
                f"layers {format_layers(self.layers)}")
