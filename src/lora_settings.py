"""The LoRA settings of a run: the validated --lora_* flags, and the layer-spec syntax they share with
merge_lora_plus.py --layer_filter. Pure Python (no torch), so train.py checks its command line fast.

Parts (`--lora_parts`), applied only to the layers of `--lora_layers`:
    att   LoRA on the time-mix key, value, receptance (not output)
    ffn   LoRA on the channel-mix key, receptance, value
    time  the time_* parameters of those blocks train whole (time_decay, time_first, time_mix_*)
    ln    the blocks' ln0 / ln1 / ln2 train whole (not ln_out)
"""
import math
import re
from dataclasses import dataclass
from typing import Optional

from src.errors import UserInputError

PARTS = ("att", "ffn", "time", "ln")

# one token of a layer spec: an optional "coef*", then a layer or an inclusive range "first-last"
_LAYER_TOKEN = re.compile(r"^(?:(?P<coef>[^*]+)\*)?(?P<first>\d+)(?:-(?P<last>\d+))?$")


def parse_layer_spec(spec: str, n_layer: Optional[int] = None, what: str = "--lora_layers",
                     coefficients: bool = False) -> dict:
    """"0-3 25-31" -> {0: 1.0, ..., 3: 1.0, 25: 1.0, ...}; with coefficients, "0.5*0-15 1*16-31" -> {0: 0.5, ...}.

    Tokens are separated by spaces or commas; each is an optional `coef*` and a layer or an inclusive
    range a-b. A layer listed twice, a reversed range or a layer >= n_layer is an error.
    """
    tokens = spec.replace(",", " ").split()
    if not tokens:
        raise UserInputError(f"{what} is empty; give layers such as '0-3 25-31'.")
    layers = {}
    for token in tokens:
        match = _LAYER_TOKEN.match(token)
        if not match:
            example = "'0.5*0-15 1*16-31'" if coefficients else "'0-3 25-31'"
            raise UserInputError(f"{what}: cannot read {token!r}; write layers and ranges such as {example}.")
        coef = 1.0
        if match["coef"] is not None:
            if not coefficients:
                raise UserInputError(f"{what} takes layers only ({token!r} has a coefficient; coefficients belong "
                                     f"to merge_lora_plus.py --layer_filter).")
            try:
                coef = float(match["coef"])
            except ValueError:
                coef = math.nan
            if not math.isfinite(coef):
                raise UserInputError(f"{what}: {match['coef']!r} in {token!r} is not a number.")
        first = int(match["first"])
        last = first if match["last"] is None else int(match["last"])
        if last < first:
            raise UserInputError(f"{what}: the range {token!r} runs backwards; write {last}-{first}.")
        for layer in range(first, last + 1):
            if layer in layers:
                raise UserInputError(f"{what} lists layer {layer} twice.")
            if n_layer is not None and layer >= n_layer:
                raise UserInputError(f"{what} lists layer {layer}, but the model has {n_layer} layers "
                                     f"(0-{n_layer - 1}).")
            layers[layer] = coef
    return layers


def format_layers(layers) -> str:
    """[0, 1, 2, 5] -> "0-2 5" (the spec syntax, so it can be pasted back into --lora_layers)."""
    ranges = []
    for layer in sorted(layers):
        if ranges and ranges[-1][1] == layer - 1:
            ranges[-1][1] = layer
        else:
            ranges.append([layer, layer])
    return " ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float
    parts: tuple  # subset of PARTS, in PARTS order
    layers: tuple  # sorted layer ids

    @property
    def scale(self) -> float:
        """The factor of the LoRA update: ΔW = (alpha / r) · B A."""
        return self.alpha / self.r

    @classmethod
    def from_flags(cls, r: int, alpha: float, dropout: float, parts: str, layers: Optional[str],
                   n_layer: int) -> "LoraSettings":
        """The validated --lora_r, --lora_alpha, --lora_dropout, --lora_parts, --lora_layers (None = every one
        of the n_layer layers); one message per mistake."""
        if r < 1:
            raise UserInputError(f"--lora_r must be at least 1 (got {r}).")
        if not (math.isfinite(alpha) and alpha > 0):
            raise UserInputError(f"--lora_alpha must be a positive number (got {alpha}).")
        if not 0 <= dropout < 1:
            raise UserInputError(f"--lora_dropout must lie in [0, 1) (got {dropout}).")
        given = [p.strip() for p in parts.replace(" ", ",").split(",") if p.strip()]
        unknown = [p for p in given if p not in PARTS]
        if unknown or not given:
            raise UserInputError(f"--lora_parts {parts!r}: use a comma list of {', '.join(PARTS)} "
                                 f"(e.g. att,ffn,time,ln).")
        chosen = range(n_layer) if layers is None else parse_layer_spec(layers, n_layer)
        return cls(r=r, alpha=float(alpha), dropout=float(dropout), parts=tuple(p for p in PARTS if p in given),
                   layers=tuple(sorted(chosen)))

    def describe(self) -> str:
        return (f"r {self.r}, alpha {self.alpha:g}, parts {','.join(self.parts)}, "
                f"layers {format_layers(self.layers)}")
